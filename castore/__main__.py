"""``python -m castore``: the same command line as the ``castore`` script."""

from castore.cli import main

if __name__ == "__main__":
    main(prog_name="castore")
