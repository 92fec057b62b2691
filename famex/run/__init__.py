"""Recipe runs: `famex run RECIPE.toml` plans the stages of a whole family and runs them in order."""
