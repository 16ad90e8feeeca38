"""The local scratch volume: the byte budget and its reservations, batch directories,
locks, the janitor's sweep and the free-space guard."""
