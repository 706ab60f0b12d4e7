"""Data: layout adapters -> canonical manifest -> audit/split -> preprocessing cache -> Dataset."""
