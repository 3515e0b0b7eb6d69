"""p3dmm.export"""
