-- One schema per service (orders, wallet, settlement), and a shadow copy of each
-- (shadow_orders, shadow_wallet, shadow_settlement) for load-test traffic, created by the
-- same function so the two can never drift apart.
--
-- The database enforces what matters for money, not only the code:
--   * money is bigint minor units; amounts are positive; balances never negative;
--   * a ledger entry's idempotency key is unique;
--   * one debit and at most one refund per order (partial unique indexes);
--   * one settlement credit per order (primary key);
--   * every wallet write checks the fencing epoch row (see wallet.fencing).

CREATE FUNCTION public.gift_create_tables(orders text, wallet text, settlement text)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format('CREATE SCHEMA %I', orders);
    EXECUTE format('CREATE SCHEMA %I', wallet);
    EXECUTE format('CREATE SCHEMA %I', settlement);

    -- wallet ---------------------------------------------------------------------------
    -- The fencing epoch of the writer allowed to write this database. Exactly one row.
    -- A promotion writes a higher epoch; a writer holding an older one commits nothing.
    EXECUTE format($$CREATE TABLE %I.fencing (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        epoch bigint NOT NULL CHECK (epoch >= 1),
        updated_at timestamptz NOT NULL DEFAULT now()
    )$$, wallet);
    EXECUTE format('INSERT INTO %I.fencing (epoch) VALUES (1)', wallet);

    EXECUTE format($$CREATE TABLE %I.accounts (
        user_id bigint PRIMARY KEY CHECK (user_id > 0),
        balance bigint NOT NULL CHECK (balance >= 0),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )$$, wallet);

    -- Append-only: seq grows with every entry (bigserial; gaps are possible, order is not
    -- broken). kind: credit (top-up), debit (gift), refund (of a debit).
    EXECUTE format($$CREATE TABLE %I.ledger (
        seq bigserial PRIMARY KEY,
        user_id bigint NOT NULL REFERENCES %I.accounts (user_id),
        kind text NOT NULL CHECK (kind IN ('credit', 'debit', 'refund')),
        amount bigint NOT NULL CHECK (amount > 0),
        order_id text CHECK (order_id IS NOT NULL OR kind = 'credit'),
        idempotency_key text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
        epoch bigint NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    )$$, wallet, wallet);
    EXECUTE format($$CREATE UNIQUE INDEX ledger_one_debit_per_order
        ON %I.ledger (order_id) WHERE kind = 'debit'$$, wallet);
    EXECUTE format($$CREATE UNIQUE INDEX ledger_one_refund_per_order
        ON %I.ledger (order_id) WHERE kind = 'refund'$$, wallet);
    EXECUTE format('CREATE INDEX ledger_user ON %I.ledger (user_id, seq)', wallet);
    -- Append-only, enforced: no UPDATE or DELETE on the ledger.
    EXECUTE format($$CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON %I.ledger
        FOR EACH ROW EXECUTE FUNCTION public.gift_reject_change()$$, wallet);

    -- orders ---------------------------------------------------------------------------
    EXECUTE format($$CREATE TABLE %I.gift_catalog (
        gift_id text PRIMARY KEY,
        name text NOT NULL,
        price bigint NOT NULL CHECK (price > 0)
    )$$, orders);
    EXECUTE format($$INSERT INTO %I.gift_catalog (gift_id, name, price) VALUES
        ('rose', 'Rose', 10),
        ('heart', 'Heart', 50),
        ('rocket', 'Rocket', 1000),
        ('castle', 'Castle', 5000)$$, orders);

    EXECUTE format($$CREATE TABLE %I.gift_orders (
        order_id text PRIMARY KEY,
        idempotency_key text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
        user_id bigint NOT NULL CHECK (user_id > 0),
        streamer_id bigint NOT NULL CHECK (streamer_id > 0),
        room_id bigint NOT NULL CHECK (room_id > 0),
        gift_id text NOT NULL REFERENCES %I.gift_catalog (gift_id),
        count integer NOT NULL CHECK (count BETWEEN 1 AND 10000),
        amount bigint NOT NULL CHECK (amount > 0),
        status text NOT NULL CHECK (status IN ('created', 'paid', 'delivered', 'failed', 'refunded', 'rejected')),
        reason text,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )$$, orders, orders);
    EXECUTE format('CREATE INDEX gift_orders_updated ON %I.gift_orders (updated_at)', orders);

    EXECUTE format($$CREATE TABLE %I.outbox (
        id bigserial PRIMARY KEY,
        order_id text NOT NULL REFERENCES %I.gift_orders (order_id),
        kind text NOT NULL,
        payload jsonb NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),
        processed_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (order_id, kind)
    )$$, orders, orders);
    EXECUTE format($$CREATE INDEX outbox_pending ON %I.outbox (next_attempt_at)
        WHERE processed_at IS NULL$$, orders);

    -- settlement -----------------------------------------------------------------------
    EXECUTE format($$CREATE TABLE %I.income (
        streamer_id bigint PRIMARY KEY CHECK (streamer_id > 0),
        balance bigint NOT NULL CHECK (balance >= 0),
        updated_at timestamptz NOT NULL DEFAULT now()
    )$$, settlement);
    EXECUTE format($$CREATE TABLE %I.credits (
        order_id text PRIMARY KEY,
        streamer_id bigint NOT NULL REFERENCES %I.income (streamer_id),
        amount bigint NOT NULL CHECK (amount > 0),
        created_at timestamptz NOT NULL DEFAULT now()
    )$$, settlement, settlement);
END
$fn$;

CREATE FUNCTION public.gift_reject_change() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP;
END
$fn$;

SELECT public.gift_create_tables('orders', 'wallet', 'settlement');
SELECT public.gift_create_tables('shadow_orders', 'shadow_wallet', 'shadow_settlement');
