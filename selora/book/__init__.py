"""Chapter helpers: toy problems, figures, sliders and annotated source for the book's chapters.

No library module imports them (tests/test_architecture.py enforces it).
"""
