"""The analyser: a config in, numbers out (what precomputing saves, where the table's bytes go).
Imports neither torch nor transformers, so `firstlayer analyze` answers at once; a test holds it
to that."""
