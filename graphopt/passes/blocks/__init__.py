"""Block erasure: residual blocks scored on calibration data and the least useful removed."""
