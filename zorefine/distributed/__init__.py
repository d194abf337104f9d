"""Running on several processes: who is who, collectives, and ZeRO-3 parameter partitions."""
