-- wrk reporter: one machine-readable line per run.
done = function(summary, latency, requests)
  local seconds = summary.duration / 1e6
  io.write(string.format("RESULT rps=%.1f requests=%d p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
    summary.requests / seconds, summary.requests, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
