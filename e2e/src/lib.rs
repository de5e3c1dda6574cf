//! Whole-system tests: the seed scenario, run against real kas and agentk processes.
