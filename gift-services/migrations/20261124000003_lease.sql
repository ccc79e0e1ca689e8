-- The writer lease (issue 5), for real and shadow traffic alike:
--   * fencing.lease_until: until when the current writer may commit. NULL: no lease enforced
--     (a database nobody has leased). The site agent renews it
--     (`UPDATE <wallet>.fencing SET lease_until = clock_timestamp() + <ttl> WHERE epoch = $E`)
--     and sets it in the past to fence.
--   * a deferred constraint trigger on the ledger refuses the COMMIT of any transaction that
--     appended a ledger entry once the lease has passed (SQLSTATE GF001, "writer lease
--     expired"): a wallet transaction that passed the fencing check, then had its database
--     frozen across a failover, commits nothing when it resumes.
--   * compensations: what an operator did about a ledger entry acknowledged on an old primary
--     and lost by a failover (one row per lost entry's idempotency key).

CREATE FUNCTION public.gift_check_lease() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    until timestamptz;
BEGIN
    EXECUTE format('SELECT lease_until FROM %I.fencing', TG_TABLE_SCHEMA) INTO until;
    IF until IS NOT NULL AND until < clock_timestamp() THEN
        RAISE EXCEPTION USING
            ERRCODE = 'GF001',
            MESSAGE = 'writer lease expired',
            DETAIL = format('%s.fencing.lease_until is %s, now %s', TG_TABLE_SCHEMA, until, clock_timestamp());
    END IF;
    RETURN NULL;
END
$fn$;

CREATE FUNCTION public.gift_create_lease_tables(wallet text)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format('ALTER TABLE %I.fencing ADD COLUMN lease_until timestamptz NULL', wallet);

    EXECUTE format($$CREATE CONSTRAINT TRIGGER ledger_lease_at_commit
        AFTER INSERT ON %I.ledger DEFERRABLE INITIALLY DEFERRED
        FOR EACH ROW EXECUTE FUNCTION public.gift_check_lease()$$, wallet);

    EXECUTE format($$CREATE TABLE %I.compensations (
        idempotency_key text PRIMARY KEY,
        action text NOT NULL CHECK (action IN ('reapply', 'refund')),
        kind text NOT NULL CHECK (kind IN ('credit', 'debit', 'refund')),
        order_id text,
        user_id bigint NOT NULL,
        amount bigint NOT NULL CHECK (amount > 0),
        operator text NOT NULL CHECK (length(operator) BETWEEN 1 AND 200),
        epoch bigint NOT NULL,
        note text NOT NULL,
        at timestamptz NOT NULL DEFAULT now()
    )$$, wallet);
END
$fn$;

SELECT public.gift_create_lease_tables('wallet');
SELECT public.gift_create_lease_tables('shadow_wallet');
