-- What the gift saga needs beyond the first schema, for real and shadow traffic alike:
--   * settlement.reversals: a streamer credit taken back when the order is refunded (the
--     effect could not be delivered). One per order, and only for a credited order.
--   * orders.leaderboard / orders.activity_applied: the weak "activity" update (room
--     leaderboard), applied at most once per order.
--   * an index to find orders by status and age (recovery sweep, reconciliation window).

CREATE FUNCTION public.gift_create_saga_tables(orders text, settlement text)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format($$CREATE TABLE %I.reversals (
        order_id text PRIMARY KEY REFERENCES %I.credits (order_id),
        streamer_id bigint NOT NULL REFERENCES %I.income (streamer_id),
        amount bigint NOT NULL CHECK (amount > 0),
        created_at timestamptz NOT NULL DEFAULT now()
    )$$, settlement, settlement, settlement);

    EXECUTE format($$CREATE TABLE %I.leaderboard (
        room_id bigint NOT NULL,
        user_id bigint NOT NULL,
        score bigint NOT NULL CHECK (score >= 0),
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (room_id, user_id)
    )$$, orders);
    EXECUTE format($$CREATE TABLE %I.activity_applied (
        order_id text PRIMARY KEY REFERENCES %I.gift_orders (order_id),
        applied_at timestamptz NOT NULL DEFAULT now()
    )$$, orders, orders);

    EXECUTE format('CREATE INDEX gift_orders_status ON %I.gift_orders (status, updated_at)', orders);
END
$fn$;

SELECT public.gift_create_saga_tables('orders', 'settlement');
SELECT public.gift_create_saga_tables('shadow_orders', 'shadow_settlement');
