"""Recommending on the device: ranking with explanations (`recommender`) and interest tags (`tags`)."""
