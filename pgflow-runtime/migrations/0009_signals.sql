-- pgflow schema, version 9: signals. A step with `#[step(signal = approval)]` waits,
-- once its parents complete, until its run receives the signal `approval`; its task
-- is parked meanwhile (out of the claim's index), due at its `signal_timeout` or
-- never ('infinity'), so a waiting run holds no worker slot and its deadline is a
-- row, durable across restarts of every instance.
-- Never edit once applied: add a migration.

-- Every signal sent to a run: the first one of a name is 'accepted' (the unique
-- index keeps it to one per run and name), later ones are recorded as 'duplicate',
-- and one that came after its step ran without it (its timeout passed first) as
-- 'late'. The claim of a waiting task reads the accepted payload.
CREATE TABLE pgflow.signals (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id  bigint      NOT NULL,
    name    text        NOT NULL,
    payload jsonb       NOT NULL,
    status  text        NOT NULL CHECK (status IN ('accepted', 'duplicate', 'late')),
    sent_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX signals_accepted ON pgflow.signals (run_id, name) WHERE status = 'accepted';
CREATE INDEX signals_run_id ON pgflow.signals (run_id);

-- The signal a task waits for, and when its step's `delay` (if any) is over: a
-- signal makes the task due then, not before. NULL for every other task (adding
-- them rewrites nothing).
ALTER TABLE pgflow.tasks ADD COLUMN waits_for text;
ALTER TABLE pgflow.tasks ADD COLUMN delay_until timestamptz;

-- The advisory lock that orders a signal and the enqueue of the step waiting for it
-- (both take it, in their transaction): whichever commits second sees the other's
-- row, so a signal sent while its step is being enqueued is never missed.
CREATE FUNCTION pgflow.lock_signal(p_run_id bigint, p_name text) RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(hashtext('pgflow.signal'), hashtext(p_run_id::text || '/' || p_name))
$$;

-- When the task of a step waiting for signal `p_name` is due: at `p_due` (after its
-- delay) when the run already has the signal, else `p_wait_ms` later (its
-- `signal_timeout`), or never ('infinity') when `p_wait_ms` is negative. Called by the
-- enqueue statements for signal steps only.
CREATE FUNCTION pgflow.signal_due(p_run_id bigint, p_name text, p_due timestamptz,
                                  p_wait_ms bigint) RETURNS timestamptz
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pgflow.lock_signal(p_run_id, p_name);
    -- a statement of its own: it sees a signal committed while we waited for the lock
    IF EXISTS (SELECT 1 FROM pgflow.signals
               WHERE run_id = p_run_id AND name = p_name AND status = 'accepted') THEN
        RETURN p_due;
    END IF;
    IF p_wait_ms < 0 THEN
        RETURN 'infinity';
    END IF;
    RETURN p_due + interval '1 millisecond' * p_wait_ms;
END
$$;

-- Sends signal `p_name` with `p_payload` to run `p_run_id`, in the caller's
-- transaction (the step sees it at commit). Returns
--   'delivered'  the step was waiting: its task is due now (and its queue notified),
--                or when its `delay` is over;
--   'kept'       the step is not reached yet: it receives the signal when it is;
--   'duplicate'  the run already has this signal: the first one wins, this one is
--                recorded;
--   'too_late'   the step already ran without it (its timeout passed first):
--                recorded.
-- Raises, with its own SQLSTATE: PGF01 no such run; PGF02 the run is finished or
-- cancelled; PGF03 no step of the run's workflow version waits for a signal of that
-- name (the message lists those that do). The DETAIL of PGF02 is the run's status,
-- that of PGF03 the names the run's steps wait for. The payload is not checked here: one that
-- does not deserialize into the step's type fails the step (permanently, with the
-- serde path), like any stored value.
CREATE FUNCTION pgflow.signal(p_run_id bigint, p_name text, p_payload jsonb) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_run    record;
    v_step   smallint;
    v_names  text;
    v_id     bigint;
    v_queue  text;
    v_due    boolean;
BEGIN
    SELECT id, workflow, version, status INTO v_run FROM pgflow.runs WHERE id = p_run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: run % does not exist', p_run_id USING ERRCODE = 'PGF01';
    END IF;
    IF v_run.status <> 'running' THEN
        RAISE EXCEPTION 'pgflow: run % has status %: it takes no more signals', p_run_id, v_run.status
            USING ERRCODE = 'PGF02', DETAIL = v_run.status;
    END IF;
    SELECT (s.ord - 1)::smallint INTO v_step
    FROM pgflow.workflows w
    CROSS JOIN LATERAL jsonb_array_elements(w.definition -> 'steps') WITH ORDINALITY AS s(step, ord)
    WHERE w.name = v_run.workflow AND w.version = v_run.version
      AND s.step -> 'signal' ->> 'name' = p_name;
    IF v_step IS NULL THEN
        SELECT string_agg(format('`%s`', s.step -> 'signal' ->> 'name'), ', ' ORDER BY s.ord)
        INTO v_names
        FROM pgflow.workflows w
        CROSS JOIN LATERAL jsonb_array_elements(w.definition -> 'steps') WITH ORDINALITY AS s(step, ord)
        WHERE w.name = v_run.workflow AND w.version = v_run.version AND s.step ? 'signal';
        RAISE EXCEPTION 'pgflow: no step of workflow `%` version % waits for a signal named `%`; %',
            v_run.workflow, v_run.version, p_name,
            COALESCE('it waits for ' || v_names, 'it waits for no signal')
            USING ERRCODE = 'PGF03', DETAIL = COALESCE(v_names, '');
    END IF;

    PERFORM pgflow.lock_signal(p_run_id, p_name);
    IF EXISTS (SELECT 1 FROM pgflow.signals
               WHERE run_id = p_run_id AND name = p_name AND status = 'accepted') THEN
        INSERT INTO pgflow.signals (run_id, name, payload, status)
        VALUES (p_run_id, p_name, p_payload, 'duplicate');
        RETURN 'duplicate';
    END IF;
    -- The step ran without it: done, running, or back for another attempt.
    IF EXISTS (SELECT 1 FROM pgflow.step_states
               WHERE run_id = p_run_id AND step = v_step
                 AND status IN ('completed', 'skipped', 'failed'))
       OR EXISTS (SELECT 1 FROM pgflow.tasks
                  WHERE run_id = p_run_id AND step = v_step
                    AND (claimed_by IS NOT NULL OR attempt > 1 OR snoozes > 0)) THEN
        INSERT INTO pgflow.signals (run_id, name, payload, status)
        VALUES (p_run_id, p_name, p_payload, 'late');
        RETURN 'too_late';
    END IF;
    INSERT INTO pgflow.signals (run_id, name, payload, status)
    VALUES (p_run_id, p_name, p_payload, 'accepted')
    RETURNING id INTO v_id;
    -- The waiting task, if the step is reached (index tasks_run_id). Its row lock
    -- keeps a claim off it until this transaction commits; a claim that took it
    -- first makes this update find nothing, and the signal is late.
    WITH t AS (
        UPDATE pgflow.tasks
        SET run_at = GREATEST(now(), COALESCE(delay_until, now())),
            parked = COALESCE(delay_until, now()) > now() + interval '1 second'
        WHERE run_id = p_run_id AND step = v_step AND waits_for = p_name
          AND claimed_by IS NULL AND attempt = 1 AND snoozes = 0
        RETURNING queue, run_at <= now() AS due
    )
    SELECT min(queue), bool_or(due) INTO v_queue, v_due FROM t;
    IF v_queue IS NOT NULL THEN
        IF v_due THEN
            PERFORM pg_notify('pgflow_tasks', v_queue);
        END IF;
        RETURN 'delivered';
    END IF;
    IF EXISTS (SELECT 1 FROM pgflow.tasks WHERE run_id = p_run_id AND step = v_step) THEN
        UPDATE pgflow.signals SET status = 'late' WHERE id = v_id;
        RETURN 'too_late';
    END IF;
    RETURN 'kept';
END
$$;
