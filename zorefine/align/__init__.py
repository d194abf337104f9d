"""The align stage: first-order safety SFT (harmful -> refusal, benign -> helpful)."""
