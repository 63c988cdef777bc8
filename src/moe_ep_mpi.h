/*
 * moe_ep_mpi.h — MPI conveniences of the public API (v1): the moe_ep.h calls that take an MPI
 * communicator, spelled with MPI_Comm instead of its Fortran handle. moe_ep.h itself includes
 * no MPI header (so the library's users need MPI's headers only with this one); everything
 * here is static inline, so libmoe_ep exports nothing for it. The caller's MPI must be the one
 * the library was built with: a Fortran handle means nothing to another MPI.
 *
 * C99 and C++.
 */
#ifndef MOE_EP_MPI_H
#define MOE_EP_MPI_H

#include <mpi.h>

#include "moe_ep.h"

#ifdef __cplusplus
extern "C" {
#endif

/* moe_ep_comm_create on an MPI_Comm (collective over comm; see moe_ep.h). */
static inline moe_status moe_ep_comm_create_mpi(MPI_Comm comm, const moe_ep_options *opts,
                                                moe_ep_comm **out)
{
    return moe_ep_comm_create((int32_t)MPI_Comm_c2f(comm), opts, out);
}

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_MPI_H */
