"""`python -m tinyrl`: the tinyrl command."""

from tinyrl.cli import main

if __name__ == "__main__":  # a spawned child (math-verify's) re-imports this module: it must not run the CLI
    main()
