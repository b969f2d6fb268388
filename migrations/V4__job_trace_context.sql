-- The W3C traceparent of the call that created a job (NULL when tracing was
-- off): the relay puts it on the job's stream entry, so the worker's spans
-- join the creator's trace.
ALTER TABLE jobs ADD COLUMN traceparent text CHECK (length(traceparent) <= 128);
