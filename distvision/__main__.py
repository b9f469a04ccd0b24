"""`python -m distvision ...`: the form torchrun starts workers with."""

from distvision.cli import main

if __name__ == "__main__":
    main()
