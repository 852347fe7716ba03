"""`convcache bench {runtime,extract,serve}`: the benchmarks a user runs on their own machine, each a
ratio against a peer in the same run (results and commands in docs/benchmarks.md). Not a stage: they
drive the stages' public functions."""
