-- The W3C trace context (`traceparent`) of the code that started a run (feature
-- `otel`): every step's span is a child of it, so a web request and the workflow it
-- started are one trace. A child run (subflow) inherits its parent's.
ALTER TABLE pgflow.runs ADD COLUMN trace_context text;
