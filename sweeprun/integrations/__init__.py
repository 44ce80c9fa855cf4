"""Bridges from training frameworks to sweeprun runs.

Each module imports its framework and nothing else imports them: ``import sweeprun``
and the CLI stay free of transformers and lightning.
"""
