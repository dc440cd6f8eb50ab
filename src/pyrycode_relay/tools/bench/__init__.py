"""`pyrycode-relay bench`: load generation and measurement against a relay."""
