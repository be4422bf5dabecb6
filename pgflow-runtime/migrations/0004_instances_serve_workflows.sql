-- pgflow schema, version 4: which workflow versions each instance serves, so that
-- runs no live instance can execute are reported (`pgflow status`, and a warning at
-- start). Entries are `name:version`. Never edit once applied: add a migration.
ALTER TABLE pgflow.instances ADD COLUMN served text[] NOT NULL DEFAULT '{}';
