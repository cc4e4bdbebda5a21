"""Other projects' own test suites, run against our middleware."""
