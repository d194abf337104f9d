"""The evaluate stage: refusal, over-refusal and utility under a threat grid, reports and comparisons."""
