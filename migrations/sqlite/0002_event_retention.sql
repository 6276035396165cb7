-- Event log retention: events with seq <= 'pruned_through' have been deleted;
-- a subscriber resuming from an older seq is told so instead of missing them.
INSERT INTO counters (name, value) VALUES ('pruned_through', 0);
