"""Flower ClientApp: thin glue translating Messages into strnet calls."""
