"""ghz configs and the fixtures they read (python -m bench.ghz.make_fixtures)."""
