"""dinokit.methods"""
