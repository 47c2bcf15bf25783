"""The shared contracts every layer above reads: the typed config (config), the run directory and
its files (rundir), and the errors with their exit codes (errors). Imports only the pure math."""
