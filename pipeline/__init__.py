"""Assembling and running beamsift pipelines: config, pipeline assembly, the CLI."""
