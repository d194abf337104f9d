"""The analyze stage: how fragile each unit's safety is under the threats, and which units to refine."""
