"""Batch archives: the strict tar header parser, the pre-upload check and the extraction."""
