"""Samplers: how a group of responses is produced for each prompt (generation, tree search)."""
