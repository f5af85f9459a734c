"""The paper's pre-training ablations (Tables 5 and 6) at small scale: `spec` (what runs), `runner` (the
runs), `summary` (mean and spread over seeds, the paper's orderings, the tables)."""
