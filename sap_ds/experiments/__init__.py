"""Many runs: comparisons, sweeps, the throughput benchmark's variants, their launching and their reports."""
