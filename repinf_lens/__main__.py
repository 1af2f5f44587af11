"""``python -m repinf_lens`` (also what ``torchrun -m repinf_lens`` runs)."""

from repinf_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
