"""Account: metric definitions, per-request timings and the access log, OpenTelemetry traces."""
