"""fulu-nas: neural architecture search for Mixture-of-Experts layers."""
