"""p3dmm.runtime"""
