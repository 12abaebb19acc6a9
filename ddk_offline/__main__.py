"""`python -m ddk_offline ...` (also the entry point for `torchrun -m ddk_offline`)."""

from ddk_offline.cli import main

if __name__ == "__main__":
    main()
