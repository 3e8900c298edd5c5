"""Banks of known images, their entries, encrypted index snapshots and bank import."""
