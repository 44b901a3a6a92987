"""`python -m moerun` runs the CLI, exactly as the `moerun` console script does."""

from moerun.cli import main

if __name__ == "__main__":
    main()
