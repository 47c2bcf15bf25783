"""Reports: pure summaries of loaded run directories (analyze, compare, gates) and their plots."""
