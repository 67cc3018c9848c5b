"""Operations around DIO: a private Redis, workload traces, benchmark statistics and machine facts."""
