"""The method itself: adapters (Eq. 1), injection, per-sample Fisher scores (Eqs. 3-4), expansion criteria,
the expansion controller (Algorithm 1, Eq. 2) and optimizer-state surgery. Imports torch only."""
