"""Ingress APIs: each translates its wire format to the canonical Chat Completions shape and back."""
