-- pgflow schema, version 15: rate limits and per-key budgets per period. A limit
-- (`RuntimeBuilder::limit`) counts requests, tokens or cents per fixed window
-- (aligned to the epoch), globally (key '') or per run key. An attempt of a step
-- that declares limits (`#[step(limits = [..])]`) reserves its weight in the current
-- window of each, all or nothing, before it starts; its completion settles the
-- reservation to what it reported. Never edit once applied: add a migration.
CREATE TABLE pgflow.limit_windows (
    name         text        NOT NULL,
    key          text        NOT NULL,
    window_start timestamptz NOT NULL,
    used         bigint      NOT NULL DEFAULT 0,
    reserved     bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (name, key, window_start)
);

-- What a claimed task reserved: [{"name", "key", "window", "amount", "unit"}],
-- settled (once, fenced) by whatever ends its claim.
ALTER TABLE pgflow.tasks ADD COLUMN limit_holds jsonb;
