"""What operators see (CONTRACT.md section 10): metrics counted across the pool processes, the
gauges and readiness read at scrape time, the HTTP endpoint on METRICS_PORT, and the log format.

May import `config` and `endpoints` only: every other package may use it.
"""
