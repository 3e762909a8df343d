"""Many runs: comparisons, sweeps, their launching and their reports."""
