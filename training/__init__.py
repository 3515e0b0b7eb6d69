"""p3dmm.training"""
