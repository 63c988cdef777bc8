# ptxas_spill_fails.cmake — ctest `ptxas_spill_fails`: the no-spill flags the wgmma kernels are
# built with (MOE_NO_SPILL_FLAGS in CMakeLists.txt: -Xptxas=--warn-on-spills,--warning-as-error)
# turn a register spill into a build error on their own, without the per-kernel -Xptxas=-v
# report (off by default since it printed 668 lines per fresh build). spill_probe.cu cannot fit
# its launch bounds' registers: compiled with the flags it must fail with ptxas's spill message,
# compiled without them it must build (so the failure is the spill's, not the compiler's).
#   cmake -DNVCC=<nvcc> -DGENCODE="<flags|...>" -DNO_SPILL="<flags|...>" -DSRC=<spill_probe.cu>
#         -DOUT=<dir> -P ptxas_spill_fails.cmake
foreach(v NVCC GENCODE NO_SPILL SRC OUT)
  if(NOT ${v})
    message(FATAL_ERROR "ptxas_spill_fails: -D${v}=... missing")
  endif()
endforeach()
string(REPLACE "|" ";" gencode "${GENCODE}")
string(REPLACE "|" ";" no_spill "${NO_SPILL}")
file(MAKE_DIRECTORY "${OUT}")
execute_process(COMMAND "${NVCC}" ${gencode} -c "${SRC}" -o "${OUT}/spill_probe_plain.o"
                RESULT_VARIABLE rc0 OUTPUT_VARIABLE o0 ERROR_VARIABLE e0)
if(NOT rc0 EQUAL 0)
  message(FATAL_ERROR "ptxas_spill_fails: the probe does not even build without the flags (${rc0}): ${o0}${e0}")
endif()
execute_process(COMMAND "${NVCC}" ${gencode} ${no_spill} -c "${SRC}" -o "${OUT}/spill_probe_checked.o"
                RESULT_VARIABLE rc1 OUTPUT_VARIABLE o1 ERROR_VARIABLE e1)
if(rc1 EQUAL 0)
  message(FATAL_ERROR "ptxas_spill_fails: a kernel that spills built with ${NO_SPILL}: spills would not fail the build")
endif()
if(NOT "${o1}${e1}" MATCHES "[Ss]pill")
  message(FATAL_ERROR "ptxas_spill_fails: the build failed (${rc1}) but not for the spill: ${o1}${e1}")
endif()
string(STRIP "${e1}" e1)
message(STATUS "ptxas_spill_fails: the spilling probe fails the build as it should: ${e1}")
