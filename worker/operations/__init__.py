"""What operators see (CONTRACT.md section 10 and `status` of section 9): metrics counted across
the pool processes, the gauges and readiness read at scrape time, the HTTP endpoint on
METRICS_PORT, the log format, and the status screen."""
